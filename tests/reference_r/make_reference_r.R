## ---------------------------------------------------------------------------------------------
## R reference values for post-fit inference on lmer fits: lmerTest (Satterthwaite / Kenward-Roger
## coefficient tables, type I/II/III ANOVA with the contrast matrices used, ranova, drop1,
## ls_means), pbkrtest (vcovAdj, KRmodcomp), emmeans (marginal means and pairwise contrasts),
## lme4 prediction (re.form variants, new levels) with hand-computed prediction standard errors,
## and lme4's influence diagnostics (hatvalues, cooks.distance, influence.merMod).
##
## Run from this folder (command of the committed files; see README "Regenerate"):
##   cd tests/reference_r && setarch x86_64 -R env R_LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/blas:/usr/lib/x86_64-linux-gnu/lapack:/usr/lib/R/lib:/usr/lib/x86_64-linux-gnu Rscript make_reference_r.R
## (plain `Rscript make_reference_r.R` works too).  Writes, relative to the working directory:
## <dataset>.csv, models.json, emmeans.json, predict.json, influence.json, provenance.json.
## README.md documents every field.  No random numbers are used; only provenance.json carries
## dates and timings.  lme4's compiled deviance rounds differently with the memory layout, so
## with address randomisation on, a few fits move by 1e-10..2e-7 between runs; `setarch -R` (no
## ASLR) with the reference BLAS gives byte-identical files.
## ---------------------------------------------------------------------------------------------
suppressPackageStartupMessages({
  library(lme4)
  library(lmerTest)   # masks lme4::lmer; every fit below is an lmerModLmerTest
  library(pbkrtest)
  library(emmeans)
  library(jsonlite)
})
T_START <- proc.time()[["elapsed"]]
SECTION_TIMES <- list()

## ============================================================================ JSON helpers
## Conventions: 15 significant digits (digits = NA); NA -> null; non-finite numbers -> the strings
## "Inf", "-Inf", "NaN" (JSON has no such numbers); matrices -> {rownames, colnames, values (rows)};
## tables (data frames) -> list of row objects, the row name under `key`.

nv <- function(x) { x <- unlist(x); as.list(setNames(as.numeric(x), names(x))) }   # named vector -> object
arr <- function(x) if (is.null(x)) list() else I(x)                                   # always a JSON array

matrix_json <- function(m) {
  m <- as.matrix(m)
  list(rownames = if (is.null(rownames(m))) NULL else I(rownames(m)),
       colnames = if (is.null(colnames(m))) NULL else I(colnames(m)),
       values = unname(lapply(seq_len(nrow(m)), function(i) I(as.numeric(m[i, ])))))
}

table_json <- function(d, key = "term", rownames_ = rownames(d)) {
  d <- as.data.frame(d, check.names = FALSE, stringsAsFactors = FALSE)
  lapply(seq_len(nrow(d)), function(i) {
    row <- lapply(d[i, , drop = FALSE], function(v) {
      v <- v[[1]]
      if (is.factor(v)) as.character(v) else v
    })
    if (!is.null(key)) c(setNames(list(rownames_[i]), key), row) else row
  })
}

clean_json <- function(x) {                      # recursively: non-finite numbers -> strings
  if (inherits(x, "AsIs") && is.numeric(x) && any(is.infinite(x) | is.nan(x))) x <- unclass(x)
  if (is.list(x)) {
    at <- attributes(x)
    y <- lapply(x, clean_json)
    if (inherits(x, "AsIs")) y <- I(y)
    if (!is.null(at$names)) names(y) <- at$names
    return(y)
  }
  if (is.numeric(x) && any(is.infinite(x) | is.nan(x))) {
    if (length(x) == 1L && is.null(names(x)) && !inherits(x, "AsIs"))   # a scalar stays a scalar
      return(if (is.nan(x)) "NaN" else if (x > 0) "Inf" else "-Inf")
    y <- lapply(x, function(v) if (is.nan(v)) "NaN" else if (is.infinite(v)) (if (v > 0) "Inf" else "-Inf") else v)
    if (!is.null(names(x))) names(y) <- names(x)
    return(y)
  }
  x
}

write_json_file <- function(x, file) {
  writeLines(toJSON(clean_json(x), auto_unbox = TRUE, pretty = TRUE, digits = NA,
                    na = "null", null = "null"), file)
}

column_info <- function(d) {
  lapply(d, function(col) {
    if (is.factor(col)) list(type = if (is.ordered(col)) "ordered factor" else "factor",
                             levels = I(levels(col)))
    else list(type = class(col)[1])
  })
}

## ============================================================================ condition capture
## Every warning and message R emits while computing a field is recorded (and muffled) in the
## model's `r_conditions`; an error is recorded as {error: message} in place of the field.
new_log <- function() { e <- new.env(); e$items <- list(); e }
run <- function(log, step, expr) {
  withCallingHandlers(
    tryCatch(expr, error = function(e) {
      log$items[[length(log$items) + 1L]] <- list(step = step, class = "error", text = conditionMessage(e))
      list(error = conditionMessage(e))
    }),
    warning = function(w) {
      log$items[[length(log$items) + 1L]] <- list(step = step, class = "warning", text = conditionMessage(w))
      invokeRestart("muffleWarning")
    },
    message = function(m) {
      log$items[[length(log$items) + 1L]] <- list(step = step, class = "message",
                                                  text = sub("\n$", "", conditionMessage(m)))
      invokeRestart("muffleMessage")
    })
}
is_err <- function(x) is.list(x) && !is.null(x$error) && length(x) == 1L

## ============================================================================ data sets
## Grouping factors that nlme stores as ordered factors (groupedData) are made unordered with the
## same level order; this changes no fit (lme4 treats grouping factors as plain factors).
unorder <- function(f) factor(as.character(f), levels = levels(f))
reset_rows <- function(d) { d <- as.data.frame(d); rownames(d) <- NULL; d }

DATA <- list()
DATA$ham <- reset_rows(lmerTest::ham)
DATA$ham_emptycell <- reset_rows(subset(lmerTest::ham, !(Product == "4" & Information == "2")))
car <- lmerTest::carrots[, c("Consumer", "Product", "Frequency", "Income", "Homesize",
                             "Preference", "sens1", "sens2")]
DATA$carrots <- reset_rows(car[complete.cases(car), ])           # drops rows with NA Income / Preference
DATA$TVbo <- reset_rows(lmerTest::TVbo[, c("Assessor", "TVset", "Repeat", "Picture",
                                           "Coloursaturation", "Sharpness")])
co2 <- as.data.frame(datasets::CO2); class(co2) <- "data.frame"
DATA$CO2 <- reset_rows(data.frame(Plant = unorder(co2$Plant), Type = co2$Type,
                                  Treatment = co2$Treatment, conc = co2$conc, uptake = co2$uptake))
o <- nlme::Orthodont
DATA$Orthodont <- reset_rows(data.frame(distance = o$distance, age = o$age, Subject = unorder(o$Subject),
                                        Sex = o$Sex, agem = 12 * o$age - 96))
mc <- nlme::Machines
DATA$Machines <- reset_rows(data.frame(Worker = unorder(mc$Worker), Machine = mc$Machine, score = mc$score))
ox <- nlme::Oxboys
DATA$Oxboys <- reset_rows(data.frame(Subject = unorder(ox$Subject), age = ox$age, height = ox$height,
                                     Occasion = ox$Occasion))          # Occasion stays ordered
oa <- MASS::oats
DATA$oats <- reset_rows(data.frame(Block = oa$B, Variety = oa$V, N = oa$N,
                                   nitro = as.numeric(sub("cwt", "", as.character(oa$N))),
                                   yield = oa$Y,
                                   w = 1 + ((seq_len(nrow(oa)) - 1) %% 5) / 4))   # prior weights 1..2
cw <- datasets::ChickWeight
DATA$ChickWeight <- reset_rows(data.frame(weight = cw$weight, Time = cw$Time, Chick = unorder(cw$Chick),
                                          Diet = cw$Diet))
es <- nlme::ergoStool
DATA$ergoStool <- reset_rows(data.frame(effort = es$effort, Type = es$Type, Subject = unorder(es$Subject)))
DATA$sleepstudy <- reset_rows(lme4::sleepstudy)

DATA_NOTES <- list(
  ham = "lmerTest::ham (648 rows)",
  ham_emptycell = "lmerTest::ham without the rows Product == 4 & Information == 2 (an empty cell)",
  carrots = "lmerTest::carrots, columns Consumer, Product, Frequency, Income, Homesize, Preference, sens1, sens2; rows with any NA in them dropped",
  TVbo = "lmerTest::TVbo, columns Assessor, TVset, Repeat, Picture, Coloursaturation, Sharpness",
  CO2 = "datasets::CO2 (Plant made an unordered factor with the same level order)",
  Orthodont = "nlme::Orthodont (Subject unordered, same level order); agem = 12 * age - 96 (age in months since 8 years: an exact linear combination of the intercept and age)",
  Machines = "nlme::Machines (Worker unordered, same level order)",
  Oxboys = "nlme::Oxboys (Subject unordered, same level order; Occasion stays an ordered factor)",
  oats = "MASS::oats renamed: Block = B, Variety = V, N = N (factor), nitro = numeric value of N (0, 0.2, 0.4, 0.6), yield = Y; w = 1 + ((row - 1) %% 5) / 4 (prior weights 1, 1.25, ..., 2 cycling over the rows)",
  ChickWeight = "datasets::ChickWeight (Chick unordered, same level order)",
  ergoStool = "nlme::ergoStool (Subject unordered, same level order)",
  sleepstudy = "lme4::sleepstudy (identical to /work/shared/reference/sleepstudy.csv)")

write_csv_maybe_gz <- function(d, name) {
  f <- paste0(name, ".csv")
  write.csv(d, f, row.names = FALSE)
  if (file.info(f)$size > 1e6) { system2("gzip", c("-9", "-f", "-n", f)); f <- paste0(f, ".gz") }
  f
}
DATA_FILES <- lapply(setNames(names(DATA), names(DATA)), function(nm) write_csv_maybe_gz(DATA[[nm]], nm))

## ============================================================================ models
## id, data set, formula, fits (REML and/or ML), contrasts argument of lmer, prior-weights column.
MODELS <- list(
  list(id = "ham_treatment", dataset = "ham", REML = c(TRUE, FALSE),
       formula = "Informed.liking ~ Product*Information + (1|Consumer) + (1|Consumer:Product)",
       notes = "treatment contrasts (R default); nested random effects Consumer / Consumer:Product"),
  list(id = "ham_sum", dataset = "ham", REML = TRUE,
       formula = "Informed.liking ~ Product*Information + (1|Consumer) + (1|Consumer:Product)",
       contrasts = list(Product = "contr.sum", Information = "contr.sum"),
       notes = "same model as ham_treatment under contr.sum: type III tables must agree"),
  list(id = "ham_SAS", dataset = "ham", REML = TRUE,
       formula = "Informed.liking ~ Product*Information + (1|Consumer) + (1|Consumer:Product)",
       contrasts = list(Product = "contr.SAS", Information = "contr.SAS"),
       notes = "same model as ham_treatment under contr.SAS (last level baseline): type III tables must agree"),
  list(id = "ham_emptycell", dataset = "ham_emptycell", REML = TRUE,
       formula = "Informed.liking ~ Product*Information + (1|Consumer) + (1|Consumer:Product)",
       notes = "rank deficient: cell Product 4 x Information 2 is empty, so Product4:Information2 is dropped"),
  list(id = "carrots_treatment", dataset = "carrots", REML = TRUE,
       formula = "Preference ~ sens2*Frequency*Income + (1 + sens2|Consumer)",
       notes = "rank deficient (empty Frequency x Income cells: 12 columns dropped); numeric covariate interacting with factors; correlated random slope. lmerTest reports p = 0.525 for sens2:Income (type III)"),
  list(id = "carrots_sum", dataset = "carrots", REML = TRUE,
       formula = "Preference ~ sens2*Frequency*Income + (1 + sens2|Consumer)",
       contrasts = list(Frequency = "contr.sum", Income = "contr.sum"),
       notes = "carrots_treatment under contr.sum: type III must agree with carrots_treatment despite the rank deficiency"),
  list(id = "carrots_crossed", dataset = "carrots", REML = c(TRUE, FALSE),
       formula = "Preference ~ sens1 + sens2 + Homesize + (1|Consumer) + (1|Product)",
       notes = "crossed random effects Consumer x Product; numeric covariates"),
  list(id = "TVbo_helmert", dataset = "TVbo", REML = TRUE,
       formula = "Coloursaturation ~ TVset*Picture + (1|Assessor) + (1|Assessor:TVset) + (1|Assessor:Picture)",
       contrasts = list(TVset = "contr.helmert", Picture = "contr.helmert"),
       notes = "Helmert contrasts; three random-effects terms on one grouping structure"),
  list(id = "TVbo_singular", dataset = "TVbo", REML = TRUE,
       formula = "Sharpness ~ TVset*Picture + (1|Assessor) + (1|Assessor:TVset) + (1|Assessor:Picture)",
       notes = "singular fit: the Assessor variance is estimated as 0 (one theta on its bound)"),
  list(id = "CO2_singular", dataset = "CO2", REML = c(TRUE, FALSE),
       formula = "uptake ~ Type*Treatment + conc + (1|Plant)",
       notes = "singular fit (theta = 0); a column named Treatment; numeric covariate conc"),
  list(id = "Orthodont_slope", dataset = "Orthodont", REML = c(TRUE, FALSE),
       formula = "distance ~ age*Sex + (age|Subject)",
       notes = "correlated random slope; numeric covariate interacting with a factor"),
  list(id = "Orthodont_alias", dataset = "Orthodont", REML = TRUE,
       formula = "distance ~ Sex*age + agem + (1|Subject)",
       notes = "rank deficient: agem = 12*age - 96 is a linear combination of (Intercept) and age, so lme4 drops agem (the whole term has no column)"),
  list(id = "Machines_nested", dataset = "Machines", REML = c(TRUE, FALSE),
       formula = "score ~ Machine + (1|Worker/Machine)",
       notes = "nested random effects written with '/': lme4 expands it to the terms (1|Machine:Worker) and (1|Worker)"),
  list(id = "Oxboys_ordered", dataset = "Oxboys", REML = TRUE,
       formula = "height ~ Occasion + (1|Subject)",
       notes = "ordered factor (9 levels) -> contr.poly columns Occasion.L, .Q, .C, ^4 ... ^8"),
  list(id = "oats_N", dataset = "oats", REML = TRUE,
       formula = "yield ~ N*Variety + (1|Block/Variety)",
       notes = "split plot; nitrogen as a factor"),
  list(id = "oats_nitro", dataset = "oats", REML = c(TRUE, FALSE),
       formula = "yield ~ nitro*Variety + (1|Block/Variety)",
       notes = "split plot; nitrogen as a numeric covariate interacting with Variety"),
  list(id = "oats_alias", dataset = "oats", REML = TRUE,
       formula = "yield ~ nitro + N + Variety + (1|Block/Variety)",
       notes = "rank deficient: nitro lies in the span of (Intercept) and N's columns, so the last N column (N0.6cwt) is dropped; N keeps 2 columns"),
  list(id = "oats_weighted", dataset = "oats", REML = TRUE, weights = "w",
       formula = "yield ~ N + Variety + (1|Block/Variety)",
       notes = "prior weights w. NB pbkrtest's Kenward-Roger (vcovAdj, KRmodcomp, hence lmerTest KR and emmeans KR) builds Sigma = sum(ggamma_i G_i) + sigma^2 I and ignores the prior weights, while its unadjusted Phi = vcov(fit) includes them"),
  list(id = "ChickWeight_slope", dataset = "ChickWeight", REML = TRUE,
       formula = "weight ~ Time*Diet + (Time|Chick)",
       notes = "unbalanced (chicks drop out); correlated random slope; numeric x factor"),
  list(id = "ergoStool_helmert", dataset = "ergoStool", REML = c(TRUE, FALSE),
       formula = "effort ~ Type + (1|Subject)",
       contrasts = list(Type = "contr.helmert"),
       notes = "Helmert contrasts; randomized block design")
)

## Fit one model in its own environment holding `dat`, so that update() (used by ranova, drop1 and
## influence) finds the data through the formula's environment.
fit_model <- function(spec, reml) {
  env <- new.env(parent = globalenv())
  env$dat <- DATA[[spec$dataset]]
  form <- as.formula(spec$formula, env = env)
  cl <- call("lmer", form, data = quote(dat), REML = reml)
  if (!is.null(spec$contrasts)) cl$contrasts <- spec$contrasts
  if (!is.null(spec$weights)) cl$weights <- as.name(spec$weights)
  eval(cl, env)
}

model_key <- function(id, reml) paste0(id, if (reml) "_REML" else "_ML")

## ============================================================================ per-model record
## lmerTest's hypotheses: one matrix per term, columns = X's (kept) columns.  drop1 gives a bare
## vector of NAs for a term whose deletion leaves X's span unchanged: written as a 1-row NA matrix.
hyp_json <- function(Llist, cols) lapply(Llist, function(L) {
  if (is.null(L)) return(NULL)
  if (!is.matrix(L)) L <- matrix(L, nrow = 1L, dimnames = list(NULL, cols))
  matrix_json(L)
})

anova_tab <- function(a) table_json(as.data.frame(a))

fit_record <- function(spec, reml) {
  log <- new_log()
  t0 <- proc.time()[["elapsed"]]
  fit <- run(log, "fit", fit_model(spec, reml))
  if (is_err(fit)) stop("fit failed for ", spec$id, ": ", fit$error)
  X <- getME(fit, "X")
  ctr <- attr(X, "contrasts")
  tt <- terms(fit)                                                   # fixed-effects terms
  Xfull <- model.matrix(tt, model.frame(fit), contrasts.arg = ctr)   # before lme4 drops aliased columns
  dropped <- attr(X, "col.dropped")
  vc <- as.data.frame(VarCorr(fit))
  vc$var1[is.na(vc$var1)] <- NA; vc$var2[is.na(vc$var2)] <- NA
  rec <- list(
    id = model_key(spec$id, reml), model = spec$id, dataset = spec$dataset,
    data_file = DATA_FILES[[spec$dataset]], formula = spec$formula, REML = reml,
    notes = spec$notes,
    contrasts_arg = spec$contrasts, weights = spec$weights,
    contrasts = ctr,
    data_columns = column_info(DATA[[spec$dataset]]),
    nobs = nobs(fit), ngrps = nv(ngrps(fit)),
    dims = nv(fit@devcomp$dims[c("N", "n", "p", "q", "nth", "reTrms")]),
    term_labels = I(attr(tt, "term.labels")), term_order = I(attr(tt, "order")),
    X_colnames = I(colnames(X)), X_assign = I(attr(X, "assign")),
    X_colnames_full = lapply(colnames(Xfull), function(nm) list(name = nm, dropped = nm %in% names(dropped))),
    X_assign_full = I(attr(Xfull, "assign")),
    rank_deficient = length(dropped) > 0, dropped_columns = arr(names(dropped)),
    containment = lapply(lmerTest:::containment(fit), I),
    theta = nv(getME(fit, "theta") * 1), theta_lower = nv(getME(fit, "lower")),
    sigma = sigma(fit), fixef = nv(fixef(fit)),
    fixef_se = nv(sqrt(diag(as.matrix(vcov(fit))))), vcov_fixef = matrix_json(vcov(fit)),
    varcorr = table_json(vc, key = NULL),
    logLik = as.numeric(logLik(fit)), logLik_df = attr(logLik(fit), "df"),
    criterion_name = if (reml) "REMLcrit" else "deviance",
    criterion = if (reml) REMLcrit(fit) else deviance(fit),
    AIC = AIC(fit), BIC = BIC(fit),
    isSingular = isSingular(fit),
    convergence_messages = arr(unlist(fit@optinfo$conv$lme4$messages)))

  ## ---- lmerTest's Satterthwaite ingredients (numerical Hessian / Jacobian of numDeriv)
  vp_names <- c(names(getME(fit, "theta")), "sigma")
  rec$satterthwaite_internals <- list(
    varpar = I(c(fit@theta, fit@sigma)), varpar_names = I(vp_names),
    vcov_varpar = matrix_json(structure(fit@vcov_varpar, dimnames = list(vp_names, vp_names))),
    Jac_list = setNames(lapply(fit@Jac_list, function(J)
      matrix_json(structure(J, dimnames = list(names(fixef(fit)), names(fixef(fit)))))), vp_names))

  ## ---- coefficient tables
  coef_tab <- function(ddf) table_json(summary(fit, ddf = ddf)$coefficients)
  rec$coef_satterthwaite <- run(log, "summary Satterthwaite", coef_tab("Satterthwaite"))
  ## Kenward-Roger: lmerTest refuses ML fits ("only available for REML model fits"), so the KR
  ## fields exist for REML fits only
  DDFS <- if (reml) c("Satterthwaite", "Kenward-Roger") else "Satterthwaite"
  if (reml) rec$coef_kenward_roger <- run(log, "summary Kenward-Roger", coef_tab("Kenward-Roger"))

  ## ---- pbkrtest: adjusted covariance (REML fits only; for ML fits pbkrtest silently refits by REML)
  if (reml) rec$vcovAdj <- run(log, "vcovAdj", matrix_json(as.matrix(pbkrtest::vcovAdj(fit))))

  ## ---- ANOVA tables and the contrast matrices (hypotheses) lmerTest used
  rec$anova <- list(); rec$anova_hypotheses <- list()
  for (type in 1:3) {
    for (ddf in DDFS) {
      key <- sprintf("type%d_%s", type, ddf)
      a <- run(log, paste("anova", key), anova(fit, type = type, ddf = ddf))
      if (is_err(a)) { rec$anova[[key]] <- a; next }
      rec$anova[[key]] <- anova_tab(a)
      if (ddf == "Satterthwaite") rec$anova_hypotheses[[sprintf("type%d", type)]] <- hyp_json(attr(a, "hypotheses"), colnames(X))
    }
  }
  ## ---- pbkrtest::KRmodcomp details for the type III hypotheses (F scaling, unscaled F)
  if (reml) {
    L3 <- attr(suppressMessages(anova(fit, type = 3)), "hypotheses")
    rec$kr_type3_details <- lapply(L3, function(L) {
      if (nrow(L) == 0) return(NULL)
      run(log, "KRmodcomp", {
        kr <- pbkrtest::KRmodcomp(fit, L)$test
        table_json(kr, key = "test")
      })
    })
  }

  ## ---- ranova (LRT per random-effects term; reduced fits use the same REML/ML criterion)
  ran_json <- function(r) list(table = table_json(as.data.frame(r)),
                               formulae = lapply(attr(r, "formulae"), function(f) deparse1(f)),
                               model = deparse1(formula(fit)))
  ## ranova evaluates the reduced lm() / lmer() calls in its parent frame: call it from the model's
  ## environment, where `dat` lives
  menv <- environment(formula(fit)); menv$fit__ <- fit
  rec$ranova <- run(log, "ranova", ran_json(evalq(ranova(fit__), menv)))
  rec$ranova_complete_terms <- run(log, "ranova reduce.terms=FALSE",
                                   ran_json(evalq(ranova(fit__, reduce.terms = FALSE), menv)))

  ## ---- drop1 (marginal F tests)
  rec$drop1 <- list()
  for (ddf in DDFS) {
    d <- run(log, paste("drop1", ddf), drop1(fit, ddf = ddf))
    rec$drop1[[ddf]] <- if (is_err(d)) d else list(table = anova_tab(d), hypotheses = hyp_json(attr(d, "hypotheses"), colnames(X)))
  }

  ## ---- ls_means for every factor term (covariates at their means), plain and pairwise
  rec$ls_means <- list()
  for (ddf in DDFS) {
    for (pw in c(FALSE, TRUE)) {
      key <- paste0(ddf, if (pw) "_pairwise" else "")
      lm_ <- run(log, paste("ls_means", key), ls_means(fit, ddf = ddf, pairwise = pw))
      if (is_err(lm_)) { rec$ls_means[[key]] <- lm_; next }
      H <- attr(lm_, "hypotheses")
      tab <- as.data.frame(lm_)
      sizes <- vapply(H, nrow, 1L)
      rec$ls_means[[key]] <- lapply(setNames(names(H), names(H)), function(term) {
        rows <- sum(sizes[seq_len(match(term, names(H)) - 1L)]) + seq_len(sizes[[term]])
        list(table = table_json(tab[rows, , drop = FALSE], key = "name"),
             hypotheses = matrix_json(H[[term]]))
      })
    }
  }
  rec$r_conditions <- log$items
  rec$elapsed_s <- proc.time()[["elapsed"]] - t0
  list(record = rec, fit = fit)
}

## ============================================================================ run the models
cat("== models\n")
t_sec <- proc.time()[["elapsed"]]
FITS <- list(); RECORDS <- list(); TIMES <- list()
for (spec in MODELS) {
  for (reml in spec$REML) {
    key <- model_key(spec$id, reml)
    cat(sprintf("  %-28s %s\n", key, spec$formula))
    out <- fit_record(spec, reml)
    FITS[[key]] <- out$fit
    TIMES[[key]] <- out$record$elapsed_s
    out$record$elapsed_s <- NULL                      # timings go to provenance.json only
    RECORDS[[length(RECORDS) + 1L]] <- out$record
  }
}
write_json_file(RECORDS, "models.json")
SECTION_TIMES$models <- proc.time()[["elapsed"]] - t_sec

## ============================================================================ emmeans
cat("== emmeans\n")
t_sec <- proc.time()[["elapsed"]]
EMM_CASES <- list(
  list(id = "ham_Product", fit = "ham_treatment_REML", specs = "~ Product"),
  list(id = "ham_Product_by_Information", fit = "ham_treatment_REML", specs = "~ Product | Information"),
  list(id = "ham_Information", fit = "ham_treatment_REML", specs = "~ Information"),
  list(id = "ham_Product_satterthwaite", fit = "ham_treatment_REML", specs = "~ Product", lmer.df = "satterthwaite"),
  list(id = "ham_Product_asymptotic", fit = "ham_treatment_REML", specs = "~ Product", lmer.df = "asymptotic"),
  list(id = "ham_Product_sum", fit = "ham_sum_REML", specs = "~ Product"),
  list(id = "ham_Product_ML", fit = "ham_treatment_ML", specs = "~ Product"),
  list(id = "Orthodont_Sex", fit = "Orthodont_slope_REML", specs = "~ Sex"),
  list(id = "Orthodont_Sex_by_age", fit = "Orthodont_slope_REML", specs = "~ Sex | age", at = list(age = c(8, 14))),
  list(id = "oats_N", fit = "oats_N_REML", specs = "~ N"),
  list(id = "oats_N_by_Variety", fit = "oats_N_REML", specs = "~ N | Variety"),
  list(id = "carrots_Income", fit = "carrots_treatment_REML", specs = "~ Income"),
  list(id = "carrots_Frequency_by_Income", fit = "carrots_treatment_REML", specs = "~ Frequency | Income"),
  list(id = "CO2_Treatment_by_Type", fit = "CO2_singular_REML", specs = "~ Treatment | Type"),
  list(id = "Machines_Machine", fit = "Machines_nested_REML", specs = "~ Machine"))
ADJUSTS <- c("tukey", "holm", "bonferroni", "none")

emm_record <- function(case) {
  log <- new_log()
  fit <- FITS[[case$fit]]
  args <- list(fit, as.formula(case$specs))
  if (!is.null(case$lmer.df)) args$lmer.df <- case$lmer.df
  if (!is.null(case$at)) args$at <- case$at
  emm <- run(log, "emmeans", do.call(emmeans, args))
  if (is_err(emm)) return(list(id = case$id, fit = case$fit, specs = case$specs, error = emm$error))
  s <- summary(emm, infer = c(TRUE, TRUE))
  grid <- as.data.frame(emm@grid)
  bynames <- emm@misc$by.vars
  bhat_names <- colnames(emm@linfct)
  if (is.null(bhat_names)) bhat_names <- names(emm@bhat)
  lin <- emm@linfct; colnames(lin) <- bhat_names
  rec <- list(id = case$id, fit = case$fit, specs = case$specs, by = arr(bynames),
              at = case$at, lmer_df_arg = case$lmer.df,
              df_method = attr(emm@dffun, "mesg"),
              nobs = nobs(fit),
              emmeans = table_json(as.data.frame(s), key = NULL),
              emmeans_messages = arr(attr(s, "mesg")),
              grid = table_json(grid, key = NULL),
              linfct = matrix_json(lin),
              V = matrix_json(emm@V),
              bhat = as.list(setNames(as.numeric(emm@bhat), bhat_names)))
  rec$pairs <- list()
  for (adj in ADJUSTS) {
    pr <- run(log, paste("pairs", adj), pairs(emm, adjust = adj))
    if (is_err(pr)) { rec$pairs[[adj]] <- pr; next }
    ps <- summary(pr, infer = c(TRUE, TRUE))
    plin <- pr@linfct; colnames(plin) <- bhat_names
    rec$pairs[[adj]] <- list(table = table_json(as.data.frame(ps), key = NULL),
                             messages = arr(attr(ps, "mesg")),
                             linfct = matrix_json(plin))
  }
  ## contrast(emm, "pairwise") is the same object as pairs(emm): recorded once to prove it
  cp <- summary(contrast(emm, "pairwise"), infer = c(TRUE, TRUE))
  rec$contrast_pairwise_equals_pairs_tukey <- isTRUE(all.equal(as.data.frame(cp),
                                                               as.data.frame(summary(pairs(emm), infer = c(TRUE, TRUE)))))
  rec$r_conditions <- log$items
  rec
}
EMM <- lapply(EMM_CASES, emm_record)
write_json_file(list(
  emm_options = list(lmer.df = get_emm_option("lmer.df"), pbkrtest.limit = get_emm_option("pbkrtest.limit"),
                     lmerTest.limit = get_emm_option("lmerTest.limit"),
                     disable.pbkrtest = get_emm_option("disable.pbkrtest")),
  cases = EMM), "emmeans.json")
SECTION_TIMES$emmeans <- proc.time()[["elapsed"]] - t_sec

## ============================================================================ prediction
## Hand-computed prediction standard errors (lme4 has none for lmer).  For each newdata row i:
##   fixed part  x_i (columns of X as fitted), random part z_i (columns of Z in lme4's b order,
##   only the terms / columns that re.form keeps; rows for new levels get their own block)
##   V    = vcov(fit)                                          (Var of beta-hat)
##   Ccv  = block-diagonal of ranef(fit, condVar = TRUE)        (per level, per term)
##   Cfull= sigma^2 * T A^{-1} T',  A = [X'WX, X'WZL; L'Z'WX, L'Z'WZL + I],  T = diag(I_p, L)
##          i.e. the joint covariance of (beta-hat - beta, b-hat - b); L = Lambda (t(Lambdat))
##   a new level's random effects: b-hat = 0, covariance Sigma_term (from VarCorr), independent of
##   beta-hat and of the other b's.
##   se_fixed = sqrt(x V x'), se_cond = sqrt(x V x' + z Ccv z'), se_joint = sqrt([x z] Cfull [x z]')
cat("== prediction\n")
t_sec <- proc.time()[["elapsed"]]

re_terms_of_fit <- function(fit) {
  ## fit's random-effects terms in lme4's order, each with its bar expression, levels and offsets
  cnms <- getME(fit, "cnms"); flist <- getME(fit, "flist"); asg <- attr(flist, "assign")
  Gp <- getME(fit, "Gp"); bars <- findbars(formula(fit)); fr <- model.frame(fit)
  bar_cols <- lapply(bars, function(b) colnames(model.matrix(eval(substitute(~foo, list(foo = b[[2]]))), fr)))
  used <- logical(length(bars))
  lapply(seq_along(cnms), function(k) {
    g <- names(cnms)[k]
    j <- which(!used & vapply(bars, function(b) deparse1(b[[3]]), "") == g &
                 vapply(bar_cols, function(cc) identical(cc, cnms[[k]]), NA))[1]
    used[j] <<- TRUE
    list(group = g, bar = bars[[j]], cnms = cnms[[k]], levels = levels(flist[[asg[k]]]),
         offset = Gp[k], Sigma = as.matrix(VarCorr(fit)[[g]])[cnms[[k]], cnms[[k]], drop = FALSE],
         postVar = attr(ranef(fit, condVar = TRUE)[[g]], "postVar"), factor_index = asg[k])
  })
}

## columns kept by re.form: list over fit terms of the kept column names (character(0) = none)
re_form_keep <- function(fit, terms_, re_form, newdata) {
  if (is.null(re_form)) return(lapply(terms_, `[[`, "cnms"))
  if (identical(re_form, NA)) return(lapply(terms_, function(t) character(0)))
  keep <- lapply(terms_, function(t) character(0))
  for (b in findbars(re_form)) {
    cols <- colnames(model.matrix(eval(substitute(~foo, list(foo = b[[2]]))), newdata))
    k <- which(vapply(terms_, function(t) t$group == deparse1(b[[3]]) && all(cols %in% t$cnms), NA))[1]
    if (is.na(k)) stop("re.form term not in the fit: ", deparse1(b))
    keep[[k]] <- union(keep[[k]], cols)
  }
  keep
}

predict_case <- function(case) {
  log <- new_log()
  fit <- FITS[[case$fit]]
  nd <- case$newdata
  dat <- DATA[[case$dataset]]
  for (nm in names(nd)) if (is.factor(dat[[nm]]))                 # new levels appended after the fit's
    nd[[nm]] <- factor(as.character(nd[[nm]]), levels = union(levels(dat[[nm]]), unique(as.character(nd[[nm]]))))
  ## fixed-effects rows
  tt <- delete.response(terms(fit))
  Xk <- getME(fit, "X")
  mf <- model.frame(tt, nd, xlev = .getXlevels(terms(fit), model.frame(fit)))
  Xn <- model.matrix(tt, mf, contrasts.arg = attr(Xk, "contrasts"))[, colnames(Xk), drop = FALSE]
  beta <- fixef(fit); V <- as.matrix(vcov(fit)); s2 <- sigma(fit)^2
  ## joint covariance of (beta-hat - beta, b-hat - b)
  Z <- as.matrix(getME(fit, "Z")); L <- t(as.matrix(getME(fit, "Lambdat"))); w <- weights(fit)
  ZL <- Z %*% L; p <- ncol(Xk); q <- ncol(Z)
  A <- rbind(cbind(crossprod(Xk, w * Xk), crossprod(Xk, w * ZL)),
             cbind(crossprod(ZL, w * Xk), crossprod(ZL, w * ZL) + diag(q)))
  Ainv <- chol2inv(chol(A))
  Tm <- as.matrix(Matrix::bdiag(diag(p), L))
  Cfull <- s2 * Tm %*% Ainv %*% t(Tm)
  terms_ <- re_terms_of_fit(fit)
  b_names <- unlist(lapply(terms_, function(t)                      # lme4's b order: level-major per term
    paste(t$group, rep(t$levels, each = length(t$cnms)), t$cnms, sep = "|")))
  dimnames(Cfull) <- list(c(colnames(Xk), b_names), c(colnames(Xk), b_names))
  bhat <- as.numeric(getME(fit, "b"))
  ## check: lme4's condVar equals the per-level diagonal blocks of sigma^2 L (L'Z'WZL + I)^{-1} L'
  Cb_cond <- s2 * L %*% solve(crossprod(ZL, w * ZL) + diag(q)) %*% t(L)
  cv_err <- max(unlist(lapply(terms_, function(t) {
    nc <- length(t$cnms)
    vapply(seq_along(t$levels), function(j) {
      idx <- t$offset + (j - 1) * nc + seq_len(nc)
      pv <- if (is.list(t$postVar)) stop("multiple terms per factor") else t$postVar[, , j]
      max(abs(Cb_cond[idx, idx] - pv)) / max(abs(pv), 1e-300)
    }, 0)
  })))
  out <- list()
  for (rf_name in names(case$re_forms)) {
    rf <- case$re_forms[[rf_name]]
    keep <- re_form_keep(fit, terms_, rf, nd)
    n <- nrow(nd)
    Zn <- matrix(0, n, q)                              # rows in lme4's b order (existing levels)
    new_var <- numeric(n)                              # z' Sigma z of new levels
    new_level <- matrix(FALSE, n, length(terms_), dimnames = list(NULL, vapply(terms_, `[[`, "", "group")))
    Ccv <- matrix(0, q, q)
    for (k in seq_along(terms_)) {
      t <- terms_[[k]]; nc <- length(t$cnms)
      for (j in seq_along(t$levels)) {                  # condVar blocks (always filled, harmless)
        idx <- t$offset + (j - 1) * nc + seq_len(nc)
        Ccv[idx, idx] <- t$postVar[, , j]
      }
      if (!length(keep[[k]])) next
      g <- as.character(eval(t$bar[[3]], nd))
      zz <- model.matrix(eval(substitute(~foo, list(foo = t$bar[[2]]))), nd)[, t$cnms, drop = FALSE]
      zz[, setdiff(t$cnms, keep[[k]])] <- 0            # columns re.form drops
      for (i in seq_len(n)) {
        j <- match(g[i], t$levels)
        if (is.na(j)) { new_level[i, k] <- TRUE; new_var[i] <- new_var[i] + drop(zz[i, ] %*% t$Sigma %*% zz[i, ]); next }
        Zn[i, t$offset + (j - 1) * nc + seq_len(nc)] <- zz[i, ]
      }
    }
    pred_fixed <- drop(Xn %*% beta)
    pred <- pred_fixed + drop(Zn %*% bhat)
    lme4_pred <- run(log, paste("predict", rf_name),
                     as.numeric(predict(fit, newdata = nd, re.form = rf, allow.new.levels = TRUE)))
    v_fixed <- rowSums((Xn %*% V) * Xn)
    v_cond <- v_fixed + rowSums((Zn %*% Ccv) * Zn) + new_var
    XZ <- cbind(Xn, Zn)
    v_joint <- rowSums((XZ %*% Cfull) * XZ) + new_var
    zq <- qnorm(0.975)
    out[[rf_name]] <- list(
      re_form = if (is.null(rf)) NULL else if (identical(rf, NA)) "NA" else deparse1(rf),
      kept_columns = setNames(lapply(keep, I), vapply(terms_, `[[`, "", "group")),
      prediction = I(pred), lme4_predict = I(lme4_pred),
      max_abs_diff_vs_lme4 = max(abs(pred - lme4_pred)),
      fixed_part = I(pred_fixed),
      new_level = lapply(seq_len(n), function(i) as.list(new_level[i, ])),
      se_fixed = I(sqrt(v_fixed)), se_cond = I(sqrt(v_cond)), se_joint = I(sqrt(v_joint)),
      se_pred_cond = I(sqrt(v_cond + s2)), se_pred_joint = I(sqrt(v_joint + s2)),
      se_pred_fixed = I(sqrt(v_fixed + s2)),
      ci95_cond = list(lower = I(pred - zq * sqrt(v_cond)), upper = I(pred + zq * sqrt(v_cond))),
      ci95_joint = list(lower = I(pred - zq * sqrt(v_joint)), upper = I(pred + zq * sqrt(v_joint))),
      pi95_cond = list(lower = I(pred - zq * sqrt(v_cond + s2)), upper = I(pred + zq * sqrt(v_cond + s2))),
      pi95_joint = list(lower = I(pred - zq * sqrt(v_joint + s2)), upper = I(pred + zq * sqrt(v_joint + s2))),
      pi95_fixed = list(lower = I(pred - zq * sqrt(v_fixed + s2)), upper = I(pred + zq * sqrt(v_fixed + s2))))
  }
  nd_out <- case$newdata
  for (nm in names(nd_out)) if (is.factor(nd_out[[nm]])) nd_out[[nm]] <- as.character(nd_out[[nm]])
  list(id = case$id, fit = case$fit, formula = formula(fit) |> deparse1(), REML = isREML(fit),
       dataset = case$dataset, data_file = DATA_FILES[[case$dataset]],
       newdata = table_json(nd_out, key = NULL), sigma = sigma(fit), z_quantile = qnorm(0.975),
       b_order = lapply(terms_, function(t) list(group = t$group, columns = I(t$cnms), levels = I(t$levels),
                                                 offset = t$offset)),
       b = I(bhat), b_names = I(b_names),
       Cfull = matrix_json(Cfull),
       checks = list(vcov_equals_Cfull_beta_block = max(abs(Cfull[seq_len(p), seq_len(p)] - V)) / max(abs(V)),
                     condVar_equals_conditional_blocks = cv_err),
       results = out, r_conditions = log$items)
}

ss <- DATA$sleepstudy
nd_ss <- data.frame(Days = c(0, 4.5, 9, 3, 0, 7, 2.25, 9),
                    Subject = c("308", "309", "372", "999", "999", "330", "1000", "308"))
nd_ss <- rbind(nd_ss, data.frame(Days = ss$Days[1:10], Subject = as.character(ss$Subject[1:10])))
nd_mach <- data.frame(Machine = c("A", "B", "C", "A", "C", "B"), Worker = c("1", "2", "6", "7", "7", "3"))
nd_orth <- data.frame(age = c(8, 11, 14, 9.5, 12), Sex = c("Male", "Female", "Male", "Female", "Male"),
                      Subject = c("M01", "F02", "M16", "F99", "M99"))
FITS$sleepstudy_slope_REML <- lmer(Reaction ~ Days + (Days | Subject), data = DATA$sleepstudy, REML = TRUE)
FITS$sleepstudy_slope_ML <- lmer(Reaction ~ Days + (Days | Subject), data = DATA$sleepstudy, REML = FALSE)
PRED_CASES <- list(
  list(id = "sleepstudy_REML", fit = "sleepstudy_slope_REML", dataset = "sleepstudy", newdata = nd_ss,
       re_forms = list(full = NULL, population = NA, intercept_only = ~ (1 | Subject),
                       slope_only = ~ (0 + Days | Subject))),
  list(id = "sleepstudy_ML", fit = "sleepstudy_slope_ML", dataset = "sleepstudy", newdata = nd_ss,
       re_forms = list(full = NULL, population = NA, intercept_only = ~ (1 | Subject))),
  list(id = "Machines_nested_REML", fit = "Machines_nested_REML", dataset = "Machines", newdata = nd_mach,
       re_forms = list(full = NULL, population = NA, worker_only = ~ (1 | Worker))),
  list(id = "Orthodont_slope_REML", fit = "Orthodont_slope_REML", dataset = "Orthodont", newdata = nd_orth,
       re_forms = list(full = NULL, population = NA, intercept_only = ~ (1 | Subject))))
PRED <- lapply(PRED_CASES, predict_case)
write_json_file(list(
  sleepstudy_fits = list(formula = "Reaction ~ Days + (Days|Subject)", data_file = DATA_FILES$sleepstudy,
                         data_columns = column_info(DATA$sleepstudy)),
  cases = PRED), "predict.json")
SECTION_TIMES$predict <- proc.time()[["elapsed"]] - t_sec

## ============================================================================ influence
cat("== influence\n")
t_sec <- proc.time()[["elapsed"]]
infl_json <- function(inf) {
  nm <- names(inf)
  g <- inf$groups
  list(groups = g, deleted = I(as.character(inf$deleted)),
       fixed_effects = nv(inf[["fixed.effects"]]),
       fixed_effects_deleted = matrix_json(inf[[grep("^fixed.effects\\[", nm)]]),
       var_cov_comps = nv(inf[["var.cov.comps"]]),
       var_cov_comps_deleted = matrix_json(inf[[grep("^var.cov.comps\\[", nm)]]),
       vcov = matrix_json(inf[["vcov"]]),
       vcov_deleted = lapply(inf[[grep("^vcov\\[", nm)]], matrix_json),
       converged = I(as.logical(inf$converged)), function_evals = I(as.numeric(inf$function.evals)),
       cooks_distance = I(as.numeric(cooks.distance(inf))),
       dfbeta = matrix_json(dfbeta(inf)), dfbetas = matrix_json(dfbetas(inf)))
}
## tight refits of every deletion (bobyqa, rhoend = 1e-10): optimizer-independent deleted estimates
tight_deleted <- function(fit, dat, gcol) {
  env <- environment(formula(fit))          # the model's environment (holds `dat`)
  units <- if (is.null(gcol)) rownames(dat) else as.character(unique(dat[[gcol]]))
  env$ctrl_tight <- lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-10, maxfun = 1e5))
  rows <- lapply(units, function(u) {
    keep <- if (is.null(gcol)) rownames(dat) != u else as.character(dat[[gcol]]) != u
    env$dat_sub <- dat[keep, , drop = FALSE]
    f <- suppressMessages(update(fit, data = dat_sub, control = ctrl_tight))   # same REML, contrasts, weights
    vc <- sigma(f)^2
    for (Vg in VarCorr(f)) vc <- c(vc, Vg[lower.tri(Vg, diag = TRUE)])
    list(fixef = fixef(f), theta = getME(f, "theta"), sigma = sigma(f), vc = vc,
         criterion = if (isREML(f)) REMLcrit(f) else deviance(f))
  })
  list(deleted = I(units),
       fixed_effects_deleted = matrix_json(do.call(rbind, lapply(rows, `[[`, "fixef")) |> `rownames<-`(units)),
       var_cov_comps_deleted = matrix_json(do.call(rbind, lapply(rows, `[[`, "vc")) |> `rownames<-`(units)),
       theta_deleted = matrix_json(do.call(rbind, lapply(rows, `[[`, "theta")) |> `rownames<-`(units)),
       sigma_deleted = I(vapply(rows, `[[`, 0, "sigma")),
       criterion_deleted = I(vapply(rows, `[[`, 0, "criterion")))
}
INFL_CASES <- list(
  list(id = "ergoStool_REML", fit = "ergoStool_helmert_REML", dataset = "ergoStool", groups = "Subject"),
  list(id = "Machines_nested_REML", fit = "Machines_nested_REML", dataset = "Machines", groups = "Worker"),
  list(id = "Orthodont_slope_REML", fit = "Orthodont_slope_REML", dataset = "Orthodont", groups = "Subject"),
  list(id = "oats_weighted_REML", fit = "oats_weighted_REML", dataset = "oats", groups = NULL, hat_only = TRUE))
influence_case <- function(case) {
  log <- new_log()
  ## lme4's influence.merMod refits through update(); an lmerModLmerTest's call re-enters
  ## lmerTest::lmer, which cannot find influence's local data, so use the plain lme4 fit
  fit <- as(FITS[[case$fit]], "lmerMod")
  fit@call[[1]] <- quote(lme4::lmer)
  dat <- DATA[[case$dataset]]
  rec <- list(id = case$id, fit = case$fit, formula = deparse1(formula(fit)), REML = isREML(fit),
              dataset = case$dataset, data_file = DATA_FILES[[case$dataset]],
              weights = if (!all(weights(fit) == 1)) "w" else NULL,
              hatvalues = I(as.numeric(hatvalues(fit))),
              cooks_distance = I(as.numeric(cooks.distance(fit))),
              rstudent = I(as.numeric(rstudent(fit))),
              residuals_pearson = I(as.numeric(residuals(fit, type = "pearson"))),
              residuals_response = I(as.numeric(residuals(fit, type = "response"))),
              rank_X = as.numeric(Matrix::rankMatrix(getME(fit, "X"))))
  if (!isTRUE(case$hat_only)) {
    rec$influence_cases <- run(log, "influence cases", infl_json(influence(fit, data = dat)))
    rec$influence_cases_tight <- run(log, "tight case deletion", tight_deleted(fit, dat, NULL))
    rec$influence_groups <- run(log, "influence groups", infl_json(influence(fit, groups = case$groups, data = dat)))
    rec$influence_groups_tight <- run(log, "tight group deletion", tight_deleted(fit, dat, case$groups))
  }
  rec$r_conditions <- log$items
  rec
}
INFL <- lapply(INFL_CASES, influence_case)
write_json_file(list(cases = INFL), "influence.json")
SECTION_TIMES$influence <- proc.time()[["elapsed"]] - t_sec

## ============================================================================ provenance
pv <- function(p) as.character(packageVersion(p))
write_json_file(list(
  R = R.version.string, platform = R.version$platform,
  packages = lapply(setNames(nm = c("lme4", "lmerTest", "pbkrtest", "emmeans", "estimability", "Matrix",
                                    "nlme", "MASS", "numDeriv", "jsonlite", "nloptr", "minqa")), pv),
  BLAS = basename(extSoftVersion()[["BLAS"]]), LAPACK = basename(La_library()),
  cores = parallel::detectCores(),
  date = format(Sys.time(), "%Y-%m-%d %H:%M:%S UTC", tz = "UTC"),
  data = DATA_NOTES,
  elapsed_s_total = proc.time()[["elapsed"]] - T_START,
  elapsed_s_sections = SECTION_TIMES,
  elapsed_s_models = TIMES), "provenance.json")
cat(sprintf("done in %.1f s\n", proc.time()[["elapsed"]] - T_START))
