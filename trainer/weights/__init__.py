"""The weight path from the learner to the rollout replicas: one `WeightTransport` interface (`transport`) with
the HTTP and NCCL transports behind it (`http`, `http_wire`, `nccl`), the sender that picks a primary and a
fall-back (`sender`), and the learner's weights read out or written as an HF directory (`export`, `shards`).
"""
