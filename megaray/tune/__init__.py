"""megaray.tune"""
