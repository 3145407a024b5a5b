"""The bottom package: facts and helpers that `serve/` and `predictor_train/` share. Imports no torch.

- `core.buckets`: the length-bucket scheme (`BucketSpec`), used by training, evaluation and admission alike;
- `core.request`: a request, its length prediction and its misprediction events;
- `core.predictors`: the one `Predictor` protocol and its free baselines;
- `core.distributed`: the DeepSpeed/torch.distributed environment helpers both sides use.
"""
