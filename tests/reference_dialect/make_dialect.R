## lme4 reference fits for R's formula dialect and contrasts (fastlmm_ext tests/test_dialect.py,
## tests/test_contrasts.py).  Run from this folder:  Rscript make_dialect.R  ->  dialect.json + CSVs
## Data: nlme's Oxboys, datasets' CO2, lmerTest's ham, and a made-up set with dotted names and
## columns named like transforms (C, I, Q, Sum, log, np, scale, ...).
suppressPackageStartupMessages({ library(lme4); library(nlme); library(splines); library(jsonlite) })
data("ham", package = "lmerTest")

nv <- function(x) as.list(setNames(as.numeric(x), names(x)))
coldesc <- function(d) lapply(d, function(v) {
  if (is.ordered(v)) list(type = "ordered factor", levels = levels(v))
  else if (is.factor(v)) list(type = "factor", levels = levels(v))
  else list(type = "numeric")
})
write_data <- function(d, file) {
  out <- d
  for (nm in names(out)) if (is.factor(out[[nm]])) out[[nm]] <- as.character(out[[nm]])
  write.csv(out, file, row.names = FALSE)
  coldesc(d)
}
records <- function(d) {
  out <- d
  for (nm in names(out)) if (is.factor(out[[nm]])) out[[nm]] <- as.character(out[[nm]])
  out
}

fits <- list()
add_fit <- function(name, formula, data, data_file, columns, REML = TRUE, contrasts = NULL,
                    contrasts_py = NULL, X_rows = NULL, newdata = NULL, full_predict = FALSE) {
  f <- as.formula(formula)
  fit <- suppressMessages(suppressWarnings(
    if (is.null(contrasts)) lme4::lmer(f, data, REML = REML)
    else lme4::lmer(f, data, REML = REML, contrasts = contrasts)))
  X <- getME(fit, "X")
  rec <- list(name = name, data_file = data_file, formula = formula, REML = REML,
              contrasts = contrasts_py, nobs = nobs(fit), data_columns = columns,
              X_colnames = colnames(X), theta = as.numeric(getME(fit, "theta")), sigma = sigma(fit),
              fixef = nv(fixef(fit)), fixef_se = nv(sqrt(diag(as.matrix(vcov(fit))))),
              criterion = if (REML) REMLcrit(fit) else deviance(fit),
              logLik = as.numeric(logLik(fit)))
  if (!is.null(X_rows)) rec$X_rows <- list(rows = X_rows - 1L, values = unname(lapply(X_rows, function(i) X[i, ])))
  if (!is.null(newdata)) {
    rec$newdata <- records(newdata)
    rec$predict_population <- as.numeric(predict(fit, newdata = newdata, re.form = NA))
    if (full_predict) rec$predict_full <- as.numeric(predict(fit, newdata = newdata))
  }
  fits[[length(fits) + 1L]] <<- rec
}

## ---- Oxboys: I(age^2), ordered factor (contr.poly by default) --------------------------------
ox <- as.data.frame(Oxboys)
ox$Subject <- factor(as.character(ox$Subject), levels = levels(ox$Subject))   # lme4 needs no order
ox_cols <- write_data(ox, "Oxboys.csv")
nd_ox <- data.frame(age = c(-1.2, -0.5, 0, 0.4, 1.3), Subject = factor(c("1", "2", "3", "4", "5"), levels = levels(ox$Subject)))
add_fit("oxboys_quadratic", "height ~ age + I(age^2) + (age|Subject)", ox, "Oxboys.csv", ox_cols,
        newdata = nd_ox, full_predict = TRUE)
add_fit("oxboys_poly", "height ~ poly(age, 2) + (age|Subject)", ox, "Oxboys.csv", ox_cols, X_rows = 1:5,
        newdata = nd_ox, full_predict = TRUE)
add_fit("oxboys_ordered", "height ~ Occasion + (1|Subject)", ox, "Oxboys.csv", ox_cols)

## ---- CO2: a column named Treatment, log/poly/ns/bs/scale of conc ------------------------------
co2 <- as.data.frame(CO2)
co2$Plant <- factor(as.character(co2$Plant), levels = levels(co2$Plant))
co2_cols <- write_data(co2, "CO2.csv")
nd_co2 <- data.frame(conc = c(80, 95, 300, 600, 1000, 1200),
                     Treatment = factor(c("nonchilled", "chilled", "chilled", "nonchilled", "chilled", "nonchilled"),
                                        levels = levels(co2$Treatment)),
                     Type = factor(c("Quebec", "Mississippi", "Quebec", "Mississippi", "Quebec", "Mississippi"),
                                   levels = levels(co2$Type)),
                     Plant = factor(c("Qn1", "Mc2", "Qc3", "Mn1", "Qn2", "Mc3"), levels = levels(co2$Plant)))
add_fit("co2_log", "uptake ~ Treatment*log(conc) + (1|Plant)", co2, "CO2.csv", co2_cols, newdata = nd_co2)
add_fit("co2_poly", "uptake ~ Treatment + poly(conc, 2) + (1|Plant)", co2, "CO2.csv", co2_cols, X_rows = 1:7,
        newdata = nd_co2)
add_fit("co2_poly_raw", "uptake ~ Treatment + poly(conc, 3, raw = TRUE) + (1|Plant)", co2, "CO2.csv", co2_cols,
        X_rows = 1:7, newdata = nd_co2)
add_fit("co2_ns", "uptake ~ Treatment + ns(conc, 3) + (1|Plant)", co2, "CO2.csv", co2_cols, X_rows = 1:7,
        newdata = nd_co2)
add_fit("co2_ns_knots", "uptake ~ ns(conc, knots = c(300, 600)) + Type + (1|Plant)", co2, "CO2.csv", co2_cols,
        X_rows = 1:7, newdata = nd_co2)
add_fit("co2_bs", "uptake ~ Type + bs(conc, df = 4) + (1|Plant)", co2, "CO2.csv", co2_cols, X_rows = 1:7,
        newdata = nd_co2)
add_fit("co2_bs_knots", "uptake ~ Type + bs(conc, knots = c(250, 500), degree = 2) + (1|Plant)", co2, "CO2.csv",
        co2_cols, X_rows = 1:7, newdata = nd_co2)
add_fit("co2_bs_intercept", "uptake ~ 0 + bs(conc, df = 5, intercept = TRUE) + Type + (1|Plant)", co2, "CO2.csv",
        co2_cols, X_rows = 1:7, newdata = nd_co2)
add_fit("co2_ns_boundary", "uptake ~ ns(conc, df = 3, Boundary.knots = c(90, 1100)) + (1|Plant)", co2, "CO2.csv",
        co2_cols, X_rows = 1:7, newdata = nd_co2)
add_fit("co2_scale", "uptake ~ Treatment + scale(conc) + (1 + scale(conc)|Plant)", co2, "CO2.csv", co2_cols,
        X_rows = 1:7, newdata = nd_co2, full_predict = TRUE)

## ---- ham: dotted names, R's contrasts -----------------------------------------------------------
ham_cols <- write_data(ham, "ham.csv")
nd_ham <- expand.grid(Product = factor(levels(ham$Product), levels = levels(ham$Product)),
                      Information = factor(levels(ham$Information), levels = levels(ham$Information)))
nd_ham$Consumer <- factor("1", levels = levels(ham$Consumer))
hf <- "Informed.liking ~ Product*Information + (1|Consumer)"
add_fit("ham_treatment", hf, ham, "ham.csv", ham_cols, newdata = nd_ham)
add_fit("ham_sum", hf, ham, "ham.csv", ham_cols, contrasts = list(Product = "contr.sum", Information = "contr.sum"),
        contrasts_py = list(Product = "contr.sum", Information = "contr.sum"), newdata = nd_ham)
add_fit("ham_sas_helmert", hf, ham, "ham.csv", ham_cols,
        contrasts = list(Product = "contr.SAS", Information = "contr.helmert"),
        contrasts_py = list(Product = "contr.SAS", Information = "contr.helmert"), newdata = nd_ham)
add_fit("ham_poly", "Informed.liking ~ Product + Information + (1|Consumer)", ham, "ham.csv", ham_cols,
        contrasts = list(Product = "contr.poly"), contrasts_py = list(Product = "contr.poly"), newdata = nd_ham)
add_fit("ham_treatment_base", "Informed.liking ~ Product + Information + (1|Consumer)", ham, "ham.csv", ham_cols,
        contrasts = list(Product = contr.treatment(levels(ham$Product), base = 2)),
        contrasts_py = list(Product = list(treatment_base = "2")), newdata = nd_ham)
cm <- matrix(c(1, 0, 0, -1, 0, 1, 0, -1), 4, dimnames = list(NULL, c("A", "B")))
add_fit("ham_matrix_named", "Informed.liking ~ Product*Information + (1|Consumer)", ham, "ham.csv", ham_cols,
        contrasts = list(Product = cm, Information = "contr.sum"),
        contrasts_py = list(Product = list(matrix = unname(lapply(1:4, function(i) cm[i, ])), colnames = colnames(cm)),
                            Information = "contr.sum"), newdata = nd_ham)
cm3 <- matrix(c(3, -1, -1, -1, 0, 2, -1, -1, 0, 0, 1, -1), 4)
add_fit("ham_matrix", "Informed.liking ~ Product + Information + (1|Consumer)", ham, "ham.csv", ham_cols,
        contrasts = list(Product = cm3),
        contrasts_py = list(Product = list(matrix = unname(lapply(1:4, function(i) cm3[i, ])))), newdata = nd_ham)
add_fit("ham_sum_no_intercept", "Informed.liking ~ 0 + Product + Information + (1|Consumer)", ham, "ham.csv",
        ham_cols, contrasts = list(Product = "contr.sum", Information = "contr.sum"),
        contrasts_py = list(Product = "contr.sum", Information = "contr.sum"), newdata = nd_ham)

## ---- made up: dotted names, columns named like transforms, R's functions -------------------------
set.seed(20240901)
n <- 240
mu <- data.frame(g.id = factor(sprintf("g%02d", rep(1:24, each = 10))))
mu$x.1 <- rnorm(n)
mu$z <- runif(n, 0.5, 4)
mu$w <- round(runif(n, -1, 1), 3)
mu$k <- sample(1:4, n, replace = TRUE)
mu$f <- factor(sample(c("lo", "mid", "hi"), n, replace = TRUE), levels = c("hi", "lo", "mid"))
mu$Treatment <- factor(sample(c("a", "b", "c"), n, replace = TRUE))
for (nm in c("C", "I", "Q", "Sum", "np", "scale", "center", "poly", "Helmert", "Diff", "bs", "lag"))
  mu[[nm]] <- round(rnorm(n), 4)
mu$log <- round(runif(n, 1, 3), 4)
mu$exp <- round(rnorm(n), 4)
mu[["my col"]] <- round(rnorm(n), 4)
b <- rnorm(24, sd = 0.8)[as.integer(mu$g.id)]
mu$y.v <- 1 + 0.5 * mu$x.1 + 0.3 * mu$z - 0.2 * mu$C + 0.1 * mu$k + 0.4 * (mu$f == "lo") + mu$w + b + rnorm(n, sd = 0.6)
mu_cols <- write_data(mu, "madeup.csv")
nd_mu <- mu[c(3, 50, 121, 200), ]
add_fit("mu_dotted", "y.v ~ x.1 + (1|g.id)", mu, "madeup.csv", mu_cols, newdata = nd_mu, full_predict = TRUE)
add_fit("mu_transform_names", "y.v ~ C + I + Q + Sum + log + np + scale + (1|g.id)", mu, "madeup.csv", mu_cols,
        newdata = nd_mu)
add_fit("mu_transform_names2", "y.v ~ Treatment*x.1 + center + poly + Helmert + Diff + exp + bs + lag + (1|g.id)", mu,
        "madeup.csv", mu_cols, newdata = nd_mu)
add_fit("mu_cross", "y.v ~ (x.1 + z + f)^2 + (1|g.id)", mu, "madeup.csv", mu_cols, newdata = nd_mu)
add_fit("mu_math", "y.v ~ sqrt(z) + log2(z) + log10(z) + log1p(z) + abs(x.1) + exp(x.1/4) + (1|g.id)", mu,
        "madeup.csv", mu_cols, newdata = nd_mu)
add_fit("mu_factor_offset", "y.v ~ factor(k) + as.numeric(f) + offset(w) + (1|g.id)", mu, "madeup.csv", mu_cols,
        newdata = nd_mu)
add_fit("mu_relevel", "y.v ~ relevel(f, \"mid\") + as.factor(k) + (1|g.id)", mu, "madeup.csv", mu_cols,
        newdata = nd_mu)
add_fit("mu_shadowed", "y.v ~ log(log) + I(C^2) + exp(-np) + (1 + x.1|g.id)", mu, "madeup.csv", mu_cols,
        newdata = nd_mu, full_predict = TRUE)
## (lme4's predict() cannot rebuild a model frame with a non-syntactic name, so no newdata here)
add_fit("mu_backticks", "y.v ~ `my col` + I(`my col`^2) + (1|g.id)", mu, "madeup.csv", mu_cols)
add_fit("mu_response", "log(z) ~ x.1 + I(x.1 > 0) + (x.1||g.id)", mu, "madeup.csv", mu_cols, newdata = nd_mu)
add_fit("mu_offset_ml", "y.v ~ x.1 + offset(log(z)) + (1|g.id)", mu, "madeup.csv", mu_cols, REML = FALSE,
        newdata = nd_mu)

## ---- R's names of model-matrix columns (model.matrix on the made-up data) -----------------------
name_formulas <- c(
  "y.v ~ I(x.1 > 0) + I(x.1^2) + I(x.1/2) + I(-x.1) + I(k %% 2) + exp(-x.1) + I(x.1*3) + I(x.1 - 1) + I(1e6*x.1) + I(1e-5 * z) + I(100000*z) + I(123456*x.1) + I(0.5*z) + I(2L*k)",
  "y.v ~ log(z, 2) + log(z, base = 10) + scale(z, center = FALSE) + poly(z, degree = 2) + I(f == 'lo') + I(x.1 > 0 & z < 2) + I(!(x.1 > 2)) + I((z + 1)^2) + I(z^-1)",
  "y.v ~ f*Treatment + log(z):f + `my col`:x.1 + (x.1 + z + k)^2",
  "y.v ~ 0 + f + x.1 + f:x.1",
  "y.v ~ Treatment + f:Treatment + z:k:x.1")
names_out <- lapply(name_formulas, function(fo) list(formula = fo, colnames = colnames(model.matrix(as.formula(fo), mu))))

out <- list(fits = fits, names = names_out, provenance = list(R = R.version.string, lme4 = as.character(packageVersion("lme4")),
                                           lmerTest = as.character(packageVersion("lmerTest")),
                                           date = format(Sys.time(), tz = "UTC")))
write_json(out, "dialect.json", auto_unbox = TRUE, pretty = TRUE, digits = NA, null = "null", na = "null")
