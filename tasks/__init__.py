"""guidedrl stage logic: plain functions, callable without Prefect (see DESIGN.md)."""
