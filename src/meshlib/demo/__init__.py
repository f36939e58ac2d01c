"""The built-in demo: real services on loopback and a policy that shows the mesh."""
