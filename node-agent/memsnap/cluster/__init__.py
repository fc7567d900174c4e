"""A real Kubernetes 1.20 cluster on memsnap's local nodes, without Docker (`memsnap cluster`)."""
