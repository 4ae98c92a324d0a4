"""Fine-tuned models out of the package: in their library's format (formats) and as MLflow
models (logged). A run's model read back or rebuilt, and the sweep's choice, are app.runs and
app.sweep_end."""
