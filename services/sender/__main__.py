from libs.service import run_service
from services.sender.service import DEFINITION

if __name__ == "__main__":
    run_service(DEFINITION)
