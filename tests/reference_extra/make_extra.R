## Extra lme4 / lmerTest reference values for fastlmm_ext's tests (weights, offsets, profile
## intervals, prediction).  Run from this folder:  Rscript make_extra.R   ->  extra.json
## Data come from lme4 itself (sleepstudy, Dyestuff, Penicillin, Pastes); derived columns are
## defined here so the Python tests can rebuild them exactly.
suppressPackageStartupMessages({ library(lme4); library(jsonlite) })

nv <- function(x) as.list(setNames(as.numeric(x), names(x)))
fitinfo <- function(fit) {
  vc <- as.data.frame(VarCorr(fit))
  list(REML = isREML(fit), criterion = if (isREML(fit)) REMLcrit(fit) else deviance(fit),
       theta = as.numeric(getME(fit, "theta")), sigma = sigma(fit), fixef = nv(fixef(fit)),
       fixef_se = nv(sqrt(diag(as.matrix(vcov(fit))))), varcorr = vc,
       logLik = as.numeric(logLik(fit)), AIC = AIC(fit), BIC = BIC(fit))
}
ci_json <- function(ci) list(rownames = rownames(ci), lower = as.numeric(ci[, 1]), upper = as.numeric(ci[, 2]))

ss <- sleepstudy
ss$w <- 1 + (ss$Days %% 3)          # prior weights: 1, 2, 3, 1, 2, 3, ...
ss$off <- 2 * ss$Days               # offset column
out <- list()

## ---- prior weights ---------------------------------------------------------------------
for (reml in c(TRUE, FALSE)) {
  f <- lmer(Reaction ~ Days + (Days | Subject), ss, weights = w, REML = reml)
  out[[paste0("weights_", if (reml) "REML" else "ML")]] <- c(
    list(formula = "Reaction ~ Days + (Days|Subject)", weights = "1 + (Days %% 3)"), fitinfo(f))
}
## ---- offsets (argument and formula term give the same fit) -------------------------------
f <- lmer(Reaction ~ Days + (1 | Subject), ss, offset = off)
out$offset_arg <- c(list(formula = "Reaction ~ Days + (1|Subject)", offset = "2 * Days"), fitinfo(f))
f <- lmer(Reaction ~ Days + offset(off) + (1 | Subject), ss)
out$offset_formula <- c(list(formula = "Reaction ~ Days + offset(off) + (1|Subject)", offset = "2 * Days"), fitinfo(f))

## ---- profile and Wald intervals ------------------------------------------------------------
prof <- list(
  list(name = "Dyestuff", formula = "Yield ~ 1 + (1|Batch)", data = Dyestuff, REML = TRUE),
  list(name = "Dyestuff_ML", formula = "Yield ~ 1 + (1|Batch)", data = Dyestuff, REML = FALSE),
  list(name = "sleepstudy", formula = "Reaction ~ Days + (Days|Subject)", data = sleepstudy, REML = TRUE),
  list(name = "Penicillin", formula = "diameter ~ 1 + (1|plate) + (1|sample)", data = Penicillin, REML = TRUE),
  list(name = "Pastes_ML", formula = "strength ~ 1 + (1|batch/cask)", data = Pastes, REML = FALSE))
out$confint <- lapply(prof, function(p) {
  f <- lmer(as.formula(p$formula), p$data, REML = p$REML)
  list(name = p$name, formula = p$formula, REML = p$REML,
       profile = ci_json(confint(f, method = "profile", level = 0.95)),
       profile90 = ci_json(confint(f, method = "profile", level = 0.90)),
       wald = ci_json(confint(f, method = "Wald")))
})

## ---- prediction ------------------------------------------------------------------------------
f <- lmer(Reaction ~ Days + (Days | Subject), sleepstudy)
nd <- data.frame(Days = c(0, 5.5, 9, 3), Subject = c("308", "309", "372", "999"))
out$predict <- list(
  formula = "Reaction ~ Days + (Days|Subject)", newdata = nd,
  full_new_levels = as.numeric(predict(f, newdata = nd, allow.new.levels = TRUE)),
  population = as.numeric(predict(f, newdata = nd, re.form = NA)))
fp <- lmer(strength ~ 1 + (1 | batch/cask), Pastes)
ndp <- data.frame(batch = c("A", "B", "J"), cask = c("a", "c", "b"))
out$predict_nested <- list(formula = "strength ~ 1 + (1|batch/cask)", newdata = ndp,
                           full = as.numeric(predict(fp, newdata = ndp)))

out$provenance <- list(R = R.version.string, lme4 = as.character(packageVersion("lme4")),
                       date = format(Sys.time(), tz = "UTC"))
write_json(out, "extra.json", auto_unbox = TRUE, pretty = TRUE, digits = NA, null = "null", na = "null")
