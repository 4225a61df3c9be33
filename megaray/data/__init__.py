"""megaray.data"""
