"""megaray.tracking"""
