"""baton.router"""
