"""What the feedback store's writer (serve/feedback.py) and its reader (predictor_train/retrain.py) agree on."""

MIN_TRAFFIC_SAMPLE = 20
"""Retraining judges a round on the store's sample of the traffic only with at least this many sampled
well-predicted records among the held-out ones, and an effective sample size (`predictor_train.retrain`'s
``effective_size``) of at least this. The mispredicted records alone judge nothing (a round that learns them scores
better on them whatever it does to the rest), and on 200 served prompts with 1-6 sampled records (rate 0.1) the
guard refused three rounds that took their new kind from 38% to 49%, 54% to 68% and 43% to 60% within one, each
because it got one of them wrong (docs/predictor.md)."""
