//! usernet DNS server. Skeleton only: the DNS issue fills it in (hickory-server).
