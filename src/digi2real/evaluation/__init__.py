"""Evaluation: verification benchmarks (LFW family, RFW), IJB-B/C 1:1, tables and ROC plots."""
