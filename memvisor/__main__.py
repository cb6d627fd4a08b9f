from memvisor.cli import entry

entry()
