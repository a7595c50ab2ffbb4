"""Runnable example workers built on brama_mq (monitor, Celery app)."""
