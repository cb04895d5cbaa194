"""Node-namespace plumbing: sysctls, the dummy device, masquerade rules, cleanup."""
