"""The method's evaluation: per step type (evaluate), BFCL tool-call accuracy (bfcl) and the
paired statistics they report (paired)."""
