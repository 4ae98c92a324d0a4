"""MLflow records of every run and the queries that read them back."""
