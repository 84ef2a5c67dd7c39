"""Numerical work of the participant pipeline (no nipype here: interfaces wrap these)."""
