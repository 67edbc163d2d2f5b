"""The HTTP faces of cellbox (FastAPI). The only package that imports fastapi/starlette."""
