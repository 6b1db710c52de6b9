# Declarations of the CHOLMOD (SuiteSparse) API used by the kernel.
# Only field and function names are declared; the C compiler reads the real
# header, so the same declarations build against CHOLMOD 3 (SuiteSparse 5.x,
# Debian 12) and CHOLMOD 4/5 (SuiteSparse 7.x, Debian 13).

cdef extern from "cholmod.h" nogil:
    int CHOLMOD_INT
    int CHOLMOD_PATTERN
    int CHOLMOD_REAL
    int CHOLMOD_DOUBLE
    int CHOLMOD_OK
    int CHOLMOD_NOT_INSTALLED
    int CHOLMOD_OUT_OF_MEMORY
    int CHOLMOD_TOO_LARGE
    int CHOLMOD_INVALID
    int CHOLMOD_NOT_POSDEF
    int CHOLMOD_DSMALL
    int CHOLMOD_A
    int CHOLMOD_L
    int CHOLMOD_Lt
    int CHOLMOD_P
    int CHOLMOD_Pt
    int CHOLMOD_NATURAL
    int CHOLMOD_GIVEN
    int CHOLMOD_AMD
    int CHOLMOD_METIS
    int CHOLMOD_NESDIS
    int CHOLMOD_COLAMD
    int CHOLMOD_SIMPLICIAL
    int CHOLMOD_AUTO
    int CHOLMOD_SUPERNODAL

    ctypedef struct cholmod_method_struct:
        int ordering

    ctypedef struct cholmod_common:
        int status
        int print "print"
        int supernodal
        int final_ll
        int nmethods
        int postorder
        int selected
        cholmod_method_struct method[10]
        double fl
        double lnz
        double anz

    ctypedef struct cholmod_sparse:
        size_t nrow
        size_t ncol
        size_t nzmax
        void *p
        void *i
        void *nz
        void *x
        void *z
        int stype
        int itype
        int xtype
        int dtype
        int sorted
        int packed

    ctypedef struct cholmod_dense:
        size_t nrow
        size_t ncol
        size_t nzmax
        size_t d
        void *x
        void *z
        int xtype
        int dtype

    ctypedef struct cholmod_factor:
        size_t n
        size_t minor
        void *Perm
        size_t nzmax
        void *p
        void *i
        void *x
        void *nz
        size_t nsuper
        void *super "super"
        void *pi
        void *px
        void *s
        int ordering
        int is_ll
        int is_super

    int cholmod_start(cholmod_common *c)
    int cholmod_finish(cholmod_common *c)
    cholmod_factor *cholmod_analyze(cholmod_sparse *A, cholmod_common *c)
    cholmod_factor *cholmod_analyze_p(cholmod_sparse *A, int *UserPerm, int *fset, size_t fsize,
                                      cholmod_common *c)
    int cholmod_factorize_p(cholmod_sparse *A, double *beta, int *fset, size_t fsize,
                            cholmod_factor *L, cholmod_common *c)
    cholmod_dense *cholmod_solve(int sys, cholmod_factor *L, cholmod_dense *B, cholmod_common *c)
    int cholmod_free_factor(cholmod_factor **L, cholmod_common *c)
    int cholmod_free_dense(cholmod_dense **X, cholmod_common *c)
    cholmod_dense *cholmod_allocate_dense(size_t nrow, size_t ncol, size_t d, int xtype,
                                          cholmod_common *c)
