"""What the entry points run, as library calls: train, evaluate, multi-stage pipelines, export.

:func:`~i2e_train.tasks.train.train` and :func:`~i2e_train.tasks.evaluate.evaluate` take a
composed config (:func:`i2e_train.config.compose`); ``i2e-train`` / ``i2e-eval`` /
``i2e-pipeline`` only parse the command line and call them.
"""
