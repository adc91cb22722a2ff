"""Drop-in replacements for the APIs kronfac grew from.

- :mod:`kronfac.compat.bayesian_lora`: ``calculate_kronecker_factors`` and its hooks, with the
  semantics of bayesian-lora 0.0.6 (last-token factors, sampled labels from the global RNG).
- :mod:`kronfac.compat.curvlinops`: ``KFACLinearOperator`` / ``EKFACLinearOperator`` with
  curvlinops' constructor and methods, computed by kronfac's engine.

Switching is one import; the numbers are the same (see ``docs/migrating_from_*.md``).
"""
