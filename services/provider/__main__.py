"""`python -m services.provider`: read the environment, then serve until SIGTERM."""

from libs.common.settings import ProviderSettings
from libs.common.web import main
from services.provider.app import create_app

if __name__ == "__main__":
    main(ProviderSettings, create_app)
