"""Pure A/B statistics over sufficient statistics: no I/O, no HTTP, no clock, no randomness.

Prometheus keeps aggregates only, so every test here starts from per-arm sufficient statistics
(``Proportion``, ``Mean``) that add up across time buckets and replicas. Degenerate data (no
traffic, an empty arm, zero variance, too few samples) gives a result with a ``status`` code,
never an exception; exceptions are for impossible inputs (negative counts) and bad config.

Modules: ``sufficient`` (the statistic types), ``result`` (status codes and the result type),
``fixed`` (fixed-horizon z and Welch tests, relative lift), ``sequential`` (always-valid mSPRT
p-values and confidence sequences), ``rank`` (Mann-Whitney U with a Hodges-Lehmann interval),
``srm`` (sample-ratio mismatch), ``multiple`` (Holm, Benjamini-Hochberg), ``power`` (sample
size), ``bayes`` (probability to beat control, expected loss).
"""
