"""Inputs this project did not make (docs/verification.md, "Inputs from outside")."""
