"""Transport between sites and the coordinator: engine-neutral messages, the in-process engine, Flower."""
