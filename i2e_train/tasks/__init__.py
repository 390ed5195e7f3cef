"""What the entry points run, as library calls: train, evaluate, multi-stage pipelines, export.

[`train`][i2e_train.tasks.train.train] and [`evaluate`][i2e_train.tasks.evaluate.evaluate] take a
composed config ([`i2e_train.config.compose`][i2e_train.config.compose]); ``i2e-train`` / ``i2e-eval`` /
``i2e-pipeline`` only parse the command line and call them.
"""
