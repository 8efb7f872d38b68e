"""guidedrl Prefect flows: wiring of the stages in tasks/, no stage logic."""
