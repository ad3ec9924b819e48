"""A tiny instrumented app for the multi-worker test (uvicorn --workers needs an import string)."""

from __future__ import annotations

import os

from fastapi import FastAPI

import asyncsentinel

app = FastAPI()
asyncsentinel.instrument(app)


@app.get("/pid")
async def pid() -> int:
    return os.getpid()
