"""A local Particle Cloud: a real HTTP server that behaves like api.particle.io as recorded in
particle-cloud-api.md. The demo, the tests and the bench talk to it; production never imports it."""
