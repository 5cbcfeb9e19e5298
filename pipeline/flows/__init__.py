"""One module per stage: the work a stage does, composed from the floors below
(data, models, strategies, training, evaluation, export, tracking, runtime)."""
