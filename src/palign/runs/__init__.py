"""Runs: the runner (align, answer, score, write per subject), its loggers, the merge of
sharded runs and the sweep table."""
