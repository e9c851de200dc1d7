"""Ray Serve deployments, the app builder, the FastAPI gateway, the job store and the CLI.

Thin by design: every model decision lives in `pipeline/`.
"""
