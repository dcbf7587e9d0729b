//go:build linux
// +build linux

/*
Copyright 2026 The Kubernetes Authors.

Licensed under the Apache License, Version 2.0 (the "License");
you may not use this file except in compliance with the License.
You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software
distributed under the License is distributed on an "AS IS" BASIS,
WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
See the License for the specific language governing permissions and
limitations under the License.
*/

package conntrack

// This file encodes batched deletes of conntrack entries by original tuple
// and reads their ACKs, replacing one netlink round trip per entry
// (vishvananda/netlink ConntrackDeleteFilters, kubernetes/kubernetes#135323).
// Pure: nlsock/ctdelete_linux.go send and receive.

import (
	"fmt"
	"syscall"
)

// appendDeleteRequest appends an IPCTNL_MSG_CT_DELETE request (with NLM_F_ACK)
// for the entry whose original tuple is fl.Orig. Many such requests are packed
// into one buffer and sent with one sendmsg.
func appendDeleteRequest(b []byte, seq uint32, family uint8, fl Flow) ([]byte, error) {
	ip, err := ipAttrs(family, fl.Orig.Src, fl.Orig.Dst)
	if err != nil {
		return b, err
	}
	proto := appendAttr(nil, ctaProtoNum, []byte{fl.Proto})
	proto = appendAttr(proto, ctaProtoSrcPort, be16(fl.Orig.SrcPort))
	proto = appendAttr(proto, ctaProtoDstPort, be16(fl.Orig.DstPort))
	tuple := appendNested(appendNested(nil, ctaTupleIP, ip), ctaTupleProto, proto)
	start := len(b)
	b = appendHeader(b, ipctnlMsgCtDelete, syscall.NLM_F_REQUEST|syscall.NLM_F_ACK, seq, family)
	b = appendNested(b, ctaTupleOrig, tuple)
	return finish(b, start), nil
}

// countAcks consumes the NLMSG_ERROR replies in b for the outstanding
// sequence numbers: errno 0 is a deletion, ENOENT "already gone".
func countAcks(b []byte, outstanding map[uint32]bool) (deleted int, firstErr error, err error) {
	msgs, err := splitMessages(b)
	if err != nil {
		return 0, nil, fmt.Errorf("decoding conntrack delete ACKs: %w", err)
	}
	for _, m := range msgs {
		if m.typ != syscall.NLMSG_ERROR || !outstanding[m.seq] {
			continue
		}
		delete(outstanding, m.seq)
		switch e := errnoOf(m); e {
		case 0:
			deleted++
		case syscall.ENOENT:
		default:
			if firstErr == nil {
				firstErr = fmt.Errorf("deleting conntrack entry: %w", e)
			}
		}
	}
	return deleted, firstErr, nil
}
