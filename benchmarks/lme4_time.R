## Time lme4::lmer on one data set, for benchmarks/compare.py.
##
##   Rscript lme4_time.R DATA.csv FORMULA REML REPEATS SLOW_S FACTORS
##
## DATA.csv: the data (header row); FORMULA: lme4 formula; REML: TRUE or FALSE; REPEATS: number of
## fits (median taken by the caller); SLOW_S: stop after one fit if it took longer than this many
## seconds; FACTORS: comma-separated columns to turn into factors ("" for none).
##
## Prints one JSON object on stdout: elapsed seconds of each fit (system.time()[["elapsed"]] around
## lmer() alone; reading the CSV is not timed) and its CPU seconds (user + system), the criterion (REMLcrit for REML fits, deviance for
## ML), NLopt's evaluation count (optinfo$feval), theta, sigma, lme4's convergence messages, the
## process's memory high-water mark before the first fit (baseline_mb) and versions.
suppressPackageStartupMessages(library(lme4))

args <- commandArgs(trailingOnly = TRUE)
if (length(args) < 5) stop("usage: Rscript lme4_time.R DATA.csv FORMULA REML REPEATS SLOW_S [FACTORS]")
csv <- args[[1]]
form <- as.formula(args[[2]])
reml <- as.logical(args[[3]])
repeats <- as.integer(args[[4]])
slow <- as.numeric(args[[5]])
factors <- if (length(args) >= 6 && nzchar(args[[6]])) strsplit(args[[6]], ",")[[1]] else character(0)

data <- read.csv(csv)
for (f in factors) data[[f]] <- factor(data[[f]])   # integer codes sort numerically, as in Python

vm_hwm_mb <- function() {
  st <- tryCatch(readLines("/proc/self/status"), error = function(e) character(0))
  line <- grep("^VmHWM:", st, value = TRUE)
  if (length(line) == 0) return(NA_real_)
  as.numeric(gsub("[^0-9]", "", line)) / 1024
}

baseline <- vm_hwm_mb()
elapsed <- cpu <- numeric(0)
repeat {
  invisible(gc())
  st <- system.time(fit <- lmer(form, data = data, REML = reml))
  elapsed <- c(elapsed, st[["elapsed"]])
  cpu <- c(cpu, st[["user.self"]] + st[["sys.self"]])
  if (length(elapsed) >= repeats || st[["elapsed"]] > slow) break
}

## Minimal JSON writer (no jsonlite dependency).
num <- function(x) if (length(x) == 1) sprintf("%.17g", x) else paste0("[", paste(sprintf("%.17g", x), collapse = ", "), "]")
str_json <- function(x) paste0("\"", gsub("\"", "\\\\\"", gsub("\\\\", "\\\\\\\\", x)), "\"")
strs <- function(x) paste0("[", paste(vapply(x, str_json, ""), collapse = ", "), "]")

crit <- if (isREML(fit)) REMLcrit(fit) else deviance(fit)
msgs <- c(fit@optinfo$conv$lme4$messages, fit@optinfo$warnings)
msgs <- as.character(unlist(msgs))
fields <- c(
  times = paste0("[", paste(sprintf("%.17g", elapsed), collapse = ", "), "]"),
  cpu_times = paste0("[", paste(sprintf("%.17g", cpu), collapse = ", "), "]"),
  criterion = num(crit),
  feval = num(fit@optinfo$feval),
  optimizer = str_json(fit@optinfo$optimizer),
  theta = paste0("[", paste(sprintf("%.17g", getME(fit, "theta")), collapse = ", "), "]"),
  sigma = num(sigma(fit)),
  warnings = strs(msgs),
  baseline_mb = num(baseline),
  peak_mb = num(vm_hwm_mb()),
  R = str_json(R.version.string),
  lme4 = str_json(as.character(packageVersion("lme4"))),
  Matrix = str_json(as.character(packageVersion("Matrix"))),
  BLAS = str_json(extSoftVersion()[["BLAS"]]),
  LAPACK = str_json(La_library())
)
cat("{", paste(sprintf("\"%s\": %s", names(fields), fields), collapse = ", "), "}\n", sep = "")
