from libs.service import run_service
from services.gateway.service import DEFINITION

# Guarded: a spawned worker process (transform's parse pool) imports this module too.
if __name__ == "__main__":
    run_service(DEFINITION)
