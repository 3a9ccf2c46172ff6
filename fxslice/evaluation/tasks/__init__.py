"""lm-eval task definitions this package carries (YAML plus the functions they name), usable offline."""
