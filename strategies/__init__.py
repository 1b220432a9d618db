"""Server side: the only place with Flower server code (ServerApp, FedSGD/FedAvg over
updates, the honest-but-curious wrapper and the attack runner)."""
