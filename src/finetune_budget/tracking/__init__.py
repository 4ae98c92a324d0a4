"""MLflow records of every run and the queries that read them back. No training and no study
logic here: the budget tracker callback is training.tracker, the sweep's parent run
app.sweep_parent."""
