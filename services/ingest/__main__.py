from libs.service import run_service
from services.ingest.service import DEFINITION

run_service(DEFINITION)
