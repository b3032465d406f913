"""A training step's rollouts: the order the questions come in (`data_order`), the replicas and the cache as
rank 0 sees them (`services`), the rollouts of each step (`source`, `collected`), seeding the cache
(`cache_init`) and evaluation through the replicas (`evaluate`).
"""
