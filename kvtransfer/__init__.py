"""baton.kvtransfer"""
