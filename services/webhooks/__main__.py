"""`python -m services.webhooks`: read the environment, then serve until SIGTERM."""

from libs.common.settings import WebhooksSettings
from libs.common.web import main
from services.webhooks.app import create_app

if __name__ == "__main__":
    main(WebhooksSettings, create_app)
