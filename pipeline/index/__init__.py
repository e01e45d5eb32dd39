"""The sharded IVF-PQ index: registry (ids), factory, train, add, merge, serve, rerank.

faiss and Ray are imported inside functions, so importing this package stays cheap.
"""
