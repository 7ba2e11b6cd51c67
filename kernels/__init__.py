"""Pure compute for SAE statistics: Triton kernels and their plain-torch references (imports torch and triton only)."""
