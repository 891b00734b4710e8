"""Results: records of measurements (`records`), their markdown (`render`) and a run's HTML report
with its figures (`report`). Imports flow one way: stages → results → pipeline → commands; nothing
here imports the pipeline, the bench or the command line."""
