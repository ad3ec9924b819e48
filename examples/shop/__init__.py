"""The example shop: a small FastAPI + SQLAlchemy 2.x async application, instrumented by
asyncsentinel, with healthy routes and one misbehaving route per finding kind (``/bad/...``).

``uvicorn shop.app:app`` (from ``examples/``) runs it; ``asyncsentinel demo`` runs it and
drives traffic at it.
"""
