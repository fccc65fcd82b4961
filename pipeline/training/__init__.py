"""The training wing: what `train` does besides stepping the optimizer on labelled batches (the
learning-rate schedule, self-training on unlabelled captchas). It stands on the data, model and
read wings; nothing but the train stage imports it."""
