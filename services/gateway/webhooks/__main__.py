from libs.service import run_service
from services.gateway.webhooks.service import DEFINITION

run_service(DEFINITION)
