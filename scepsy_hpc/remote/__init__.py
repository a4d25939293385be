"""Remote use from a workstation: the CLI run on the login node over SSH (`scepsy --remote HOST`),
and a local port forwarded to a deployment's gateway (`scepsy tunnel`). paramiko, with the user's
~/.ssh/config, agent and known_hosts (`remote.ssh`)."""
