"""Webhooks: the subscription API (:mod:`.routes`) and the dispatcher (:mod:`.dispatcher`).

The dispatcher also runs on its own with ``python -m services.gateway.webhooks``.
"""

from services.gateway.webhooks.dispatcher import WebhookDispatcher
from services.gateway.webhooks.routes import WEBHOOK_SETTINGS, WEBHOOK_STORE, add_webhook_routes
from services.gateway.webhooks.settings import WebhookSettings

__all__ = [
    "WEBHOOK_SETTINGS",
    "WEBHOOK_STORE",
    "WebhookDispatcher",
    "WebhookSettings",
    "add_webhook_routes",
]
